"""Retrieval (person re-identification): identity classification in training; in evaluation each query's
embedding ranks the gallery by cosine distance, scored by mAP and CMC rank-1/5/10 (`metrics.rank_metrics`).

Validation queries and gallery come from training identities held out of training (the reward never sees a
test identity); test queries and gallery are the dataset's own (`query/`, `bounding_box_test/`) or, for the
in-memory datasets, its held-out classes with synthetic cameras.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from amlfs.spec import TaskSpec
from amlfs_trainer.data import TaskData, resolve_root
from amlfs_trainer.readers.reid import FORMATS, Entry, read_reid
from amlfs_trainer.tasks.base import Gallery, OpenSetData, Task, embeddings
from amlfs_trainer.tasks.metrics import RANKS, cosine_distance, rank_metrics
from amlfs_trainer.tasks.openset import carve_identities, check_queries, hash_seed, query_gallery
from amlfs_trainer.tasks.sources import (
    RETRIEVAL_SIZE,
    ImageListData,
    image_size,
    in_memory_open_set,
    train_subset,
    transforms,
)


class Retrieval(Task):
    kind = "retrieval"

    def load(self, task: TaskSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
        if task.dataset not in FORMATS:
            return in_memory_open_set(task, device, cache_dir, self.kind)
        return _reid_files(task, resolve_root(task, cache_dir), device)

    def evaluate(self, model: nn.Module, data: TaskData, batch_size: int, logit_scale: float) -> dict[str, float]:
        assert isinstance(data, OpenSetData)
        out: dict[str, float] = {}
        for split in ("val", "test"):
            q, g = data.galleries[f"{split}-query"], data.galleries[f"{split}-gallery"]
            dist = cosine_distance(
                embeddings(model, data, f"{split}-query", batch_size),
                embeddings(model, data, f"{split}-gallery", batch_size),
            )
            r = rank_metrics(dist, q.ids, g.ids, q.cams, g.cams)
            out[f"{split}MAP"] = r.mAP
            out |= {f"{split}Rank{k}": r.cmc[k] for k in RANKS}
            out[f"{split}Queries"] = float(r.valid_queries)
        return out


def _reid_files(task: TaskSpec, root: Path, device: torch.device) -> OpenSetData:
    ds = read_reid(root, task.dataset)
    label = FORMATS[task.dataset].label
    train_ids, val_ids = carve_identities(
        sorted({e.person for e in ds.train}), task.val_fraction, task.split_seed, 1, label
    )
    label_of = {p: i for i, p in enumerate(train_ids)}
    train = [(e.path, label_of[e.person]) for e in ds.train if e.person in label_of]
    train = [train[i] for i in train_subset(len(train), task).tolist()]
    held = set(val_ids)
    val = [e for e in ds.train if e.person in held]
    ids = torch.tensor([e.person for e in val])
    cams = torch.tensor([e.camera for e in val])
    q, g = query_gallery(ids, cams, hash_seed("val", task.split_seed))
    parts: dict[str, list[Entry]] = {
        "val-query": [val[i] for i in q.tolist()],
        "val-gallery": [val[i] for i in g.tolist()],
        "test-query": ds.query,
        "test-gallery": ds.gallery,
    }
    galleries = {
        name: Gallery(torch.tensor([e.person for e in es]), torch.tensor([e.camera for e in es]))
        for name, es in parts.items()
    }
    for split in ("val", "test"):
        check_queries(galleries[f"{split}-query"], galleries[f"{split}-gallery"], f"task.dataRoot ({label} {split})")
    size = image_size(task, RETRIEVAL_SIZE)
    train_tf, eval_tf = transforms(size, task.augment, crop_erase=True, erasing=task.random_erasing)
    sets = {name: [(e.path, e.person) for e in es] for name, es in parts.items()}
    inner = ImageListData(train, sets, len(train_ids), size, train_tf, eval_tf, device, task.num_workers)
    return OpenSetData(inner, galleries)
