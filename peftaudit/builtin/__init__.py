"""Built-in plugins: peftaudit's own behaviour, registered through the public hooks."""
