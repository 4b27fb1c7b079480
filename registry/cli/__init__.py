"""The click layer: argument parsing, output and the error-to-exit-code edge."""
