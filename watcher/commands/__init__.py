"""The operator's commands: the command line, status and retry-failed, one-shot upload, the demo."""
