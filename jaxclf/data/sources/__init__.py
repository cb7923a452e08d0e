"""Where images come from. Each loader returns a `jaxclf.data.types.Dataset`."""
