"""The run's config: schema, loading, rules, the plug-in registry, the resume policy."""
