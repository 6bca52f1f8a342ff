"""Edit quality: the sweep, its metrics and its report."""
