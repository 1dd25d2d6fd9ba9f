"""Dataset readers: file names and layouts on disk -> lists of (path, identity, camera) or image pairs.

No tensors here (the task data in `amlfs_trainer.tasks` holds those); every malformed input is a `DataError`
naming the file (and line) and the fix.
"""
