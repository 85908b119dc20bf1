"""routes.yaml: schema (models), loading with line-accurate errors (loader, yamlsrc)."""
