"""The methods, one module each, every one compiled to the intervention engine of ``core``."""
