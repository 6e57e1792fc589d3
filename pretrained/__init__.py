"""The shipped checkpoints (one per architecture) and their training reports, as package
data: `checkpoints.PRETRAINED_DIR` finds them here through `importlib.resources`, in a
clone and in an installed wheel alike."""
