"""agov: policy-as-code governance for AI agents, on OPA/Rego."""

__version__ = "0.1.0"
