"""Verification (faces): identity classification in training; in evaluation the cosine similarity of each
pair's embeddings decides same/different, scored by k-fold accuracy (`metrics.verification_accuracy`: each
fold's threshold chosen on the others; mean and standard deviation over folds).

Validation pairs are built deterministically from training identities held out of training; test pairs come
from an LFW-format pairs file (casia-webface) or from the held-out classes of an in-memory dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from amlfs.spec import TaskSpec
from amlfs_trainer.data import TaskData, resolve_root
from amlfs_trainer.readers.faces import read_identity_folders, read_pairs
from amlfs_trainer.tasks.base import OpenSetData, Pairs, Task, embeddings
from amlfs_trainer.tasks.metrics import verification_accuracy
from amlfs_trainer.tasks.openset import build_pairs, carve_identities, hash_seed
from amlfs_trainer.tasks.sources import (
    FACE_SIZE,
    ImageListData,
    fetch_local,
    image_size,
    in_memory_open_set,
    train_subset,
    transforms,
)


class Verification(Task):
    kind = "verification"

    def load(self, task: TaskSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
        if task.dataset != "casia-webface":
            return in_memory_open_set(task, device, cache_dir, self.kind)
        return _face_files(task, resolve_root(task, cache_dir), device, cache_dir)

    def evaluate(self, model: nn.Module, data: TaskData, batch_size: int, logit_scale: float) -> dict[str, float]:
        assert isinstance(data, OpenSetData)
        out: dict[str, float] = {}
        for split in ("val", "test"):
            p = data.pairs[f"{split}-pairs"]
            e = torch.nn.functional.normalize(embeddings(model, data, f"{split}-pairs", batch_size), dim=1)
            a, b = p.a.to(e.device), p.b.to(e.device)
            scores = (e[a] * e[b]).sum(1)
            r = verification_accuracy(scores, p.same.to(e.device), p.fold)
            out[f"{split}Accuracy"] = r.accuracy
            out[f"{split}AccuracyStd"] = r.std
            out[f"{split}Pairs"] = float(len(p.a))
        return out


def _face_files(task: TaskSpec, root: Path, device: torch.device, cache: Path | None) -> OpenSetData:
    names, samples = read_identity_folders(root)
    train_ids, val_ids = carve_identities(list(range(len(names))), task.val_fraction, task.split_seed, 2, str(root))
    label_of = {p: i for i, p in enumerate(train_ids)}
    train = [(path, label_of[i]) for path, i in samples if i in label_of]
    train = [train[i] for i in train_subset(len(train), task).tolist()]
    held = set(val_ids)
    val = [(path, i) for path, i in samples if i in held]
    val_pairs = build_pairs(torch.tensor([i for _, i in val]), hash_seed("val", task.split_seed))
    pairs_file = fetch_local(task.pairs.file, cache, "task.pairs.file", is_file=True)
    images = fetch_local(task.pairs.images_root, cache, "task.pairs.imagesRoot", is_file=False)
    test = read_pairs(pairs_file, images)
    index: dict[Path, int] = {}
    for pair in test:
        for p in (pair.a, pair.b):
            index.setdefault(p, len(index))
    test_pairs = Pairs(
        torch.tensor([index[p.a] for p in test]),
        torch.tensor([index[p.b] for p in test]),
        torch.tensor([p.same for p in test]),
        torch.tensor([p.fold for p in test]),
    )
    size = image_size(task, FACE_SIZE)
    train_tf, eval_tf = transforms(size, task.augment, crop_erase=False, erasing=0.0)
    sets = {"val-pairs": val, "test-pairs": [(p, -1) for p in index]}
    inner = ImageListData(train, sets, len(train_ids), size, train_tf, eval_tf, device, task.num_workers)
    return OpenSetData(inner, pairs={"val-pairs": val_pairs, "test-pairs": test_pairs})
