"""Apple's side of the workflow: adding devices to the organisation and MDM assignment."""
