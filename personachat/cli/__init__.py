"""Command-line entry points: the code behind scripts/ and the personachat-* commands."""
