"""Command-line tools for nsmla: data preprocessing and building the bundled corpus."""
