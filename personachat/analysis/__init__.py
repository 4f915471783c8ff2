"""Persona analysis: persona space, probes, collapse, patching, contrasts and the report."""
