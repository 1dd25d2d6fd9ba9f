"""A finished search's loss as a small file for one's own training loop (`amlfs export`).

The file is JSON: the loss program of the search's final mu (as its samples trained it: class balance and logit
adjustment included; for selection-only, the preset) and the head it acts on. `amlfs_trainer.exported_loss(path)`
turns it into an `nn.Module`: ``criterion(outputs, target)``, outputs being the network's logits (a linear head) or
its cosines (a cosine head).
"""

from __future__ import annotations

import json
from typing import Any

from amlfs import stored
from amlfs.spec import SpecError

FORMAT = "amlfs-loss/v1"


def exported(root: str) -> dict[str, Any]:
    """The export of the search whose storage root is `root` (s3://..., file://... or a local directory)."""
    base = stored.root_uri(root)
    uri = f"{base}/final/mu.json"
    mu = stored.read_final(base)
    if mu is None:
        raise SpecError(f"{uri}: no final loss here (not a finished search); give a finished search's storage root")
    missing = [k for k in ("loss", "head", "scale") if k not in mu]
    if missing:
        raise SpecError(
            f"{uri}: has no {', '.join(missing)} (written by an older amlfs); run the search to its end again"
        )
    return {
        "format": FORMAT,
        "program": mu["loss"],
        "head": mu["head"],
        "scale": mu["scale"],
        "search": {
            k: mu[k] for k in ("space", "parameterization", "intervals", "names", "mu", "sigma", "epochs") if k in mu
        },
        "source": root,
    }


def text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1) + "\n"
