"""Subprocess worker for tests/test_sharding.py: restores a converted checkpoint onto fake CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before jax starts:
``python tests/_sharding_worker.py CKPT REFERENCE.npz MESH [MESH ...]``; prints one JSON line per mesh.
"""

import json
import sys

import numpy as np


def main(ckpt: str, reference: str, meshes: list[str]) -> None:
  import jax

  import duojax

  ref = np.load(reference)
  tokens, want, perm1 = ref["tokens"], ref["logits"], ref["perm"]
  k_orig = {int(k.split("_")[1]): ref[k] for k in ref.files if k.startswith("k_")}
  for spec in meshes:
    loaded = duojax.load(ckpt, mesh=spec)
    cfg = loaded.config
    D = cfg.head_dim
    tp = dict(loaded.mesh.shape)["tp"]
    got = np.asarray(loaded.model(jax.numpy.asarray(tokens), impl="reference"))
    rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    shards = {}
    for l in range(cfg.num_hidden_layers):
      k = loaded.params["layers"][l]["attn"]["k"]["kernel"]
      full = np.asarray(loaded.duo.full[l])
      per_shard = {}
      for s in k.addressable_shards:
        cols = s.index[1]
        start, stop = cols.start or 0, cols.stop if cols.stop is not None else k.shape[1]
        heads = list(range(start // D, stop // D))
        # The shard's data must be the original k columns of the heads the layout puts there.
        orig_heads = loaded.perm[l][heads]
        expect = np.concatenate([k_orig[l][:, h * D:(h + 1) * D] for h in orig_heads], axis=1)
        assert np.array_equal(np.asarray(s.data), expect), (spec, l, heads)
        per_shard[f"{start // D}-{stop // D}"] = {"retrieval": int(full[heads].sum()),
                                                  "layout": [int(x) for x in full[heads]]}
      shards[l] = per_shard
    print(json.dumps({"mesh": spec, "tp": tp, "devices": jax.device_count(), "rel_error": rel,
                      "k_spec": str(loaded.params["layers"][0]["attn"]["k"]["kernel"].sharding.spec),
                      "shards": shards}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3:])
