"""Bridges to other libraries. Each submodule imports its library, so import the submodule you
need (`molf.integrations.transformers`); `import molf` never imports them."""
