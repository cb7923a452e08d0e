"""Where images come from. Each loader returns a `jaxclf.data.dataset.Dataset`."""
