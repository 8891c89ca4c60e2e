"""What a person sees: plots, the circuit drawing, HTML reports and the ``circuitkit`` command."""
