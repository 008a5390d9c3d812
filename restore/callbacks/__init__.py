"""restore.callbacks: Lightning callbacks shared by the methods."""
