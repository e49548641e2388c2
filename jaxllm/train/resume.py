"""Resume policy: config compatibility, restore-or-init, and the data position.

- A workdir resumes only under the same parameter shapes (`config.SHAPE_KEYS`, plus
  `train.spike_window`, the shape of the step guard's window, and for adam8bit the keys
  that fix its state layout: `OPT_STATE_KEYS`); anything else may change
  between runs (more steps, eval/log cadence, learning rate, checkpoint cadence, mesh
  shape, device count, process count, batch size).
- The newest readable checkpoint is restored onto the current mesh (the abstract target
  carries its shardings); unreadable newer steps are moved aside (`checkpoint.py`).
- Data position: when the data layout is unchanged (process count, global batch, sequence
  length, packing, data path and mixture), the saved grain iterator state is restored and
  the data order is exact. Otherwise the iterator is repositioned and a `data_reposition`
  event says how: `sample_count` (sequence-level iterators: continue at the global sample
  count; with the same global batch and seq_len every step sees exactly the samples it
  would have seen, only their order inside the batch differs) or `reshuffle` (packed
  iterators whose state has no sample position: a fresh shuffle seeded with
  train.seed + step).
"""

from __future__ import annotations

from jaxllm import parallel
from jaxllm.checkpoint import data_meta
from jaxllm.config import SHAPE_KEYS, ConfigError, get_key, keep_saved_behaviour
from jaxllm.run import saved_config
from jaxllm.state import abstract_state, init_state

RESUME_KEYS = SHAPE_KEYS + ("train.spike_window",)
# keys that fix the optimizer state's layout, per optimizer
OPT_STATE_KEYS = {"adam8bit": ("optim.block_size", "optim.min_8bit_size",
                               "optim.fp32_embedding_state")}


def check_compatible(cfg, workdir) -> None:
    """Refuse to resume a workdir whose saved config has other parameter shapes; keys the
    saved config predates keep the behaviour the run started with
    (`config.keep_saved_behaviour`: no padding mask without `model.vocab_used`)."""
    saved = saved_config(workdir)
    if saved is None:
        return
    keep_saved_behaviour(cfg, saved)
    bad = []
    for key in RESUME_KEYS + OPT_STATE_KEYS.get(cfg.optim.name, ()):
        old, now = get_key(saved, key, None), get_key(cfg, key)
        if old is not None and old != now:
            bad.append(f"{key} (saved {old!r}, now {now!r})")
    if bad:
        raise ConfigError(f"{workdir}: config incompatible with its checkpoints: "
                          + ", ".join(bad) + "; use a new --workdir or restore the values")


def same_layout(cfg, meta: dict) -> bool:
    now = data_meta(cfg, 0)
    return all(meta.get(k) == now[k] for k in now if k != "samples_seen")


def start(cfg, mesh, tx, ckpt, make_iter):
    """Restore the newest readable checkpoint or build a fresh state.

    `make_iter(seed)` builds the train iterator. Returns (model_def, state, shardings,
    train_iter, restored_step or None, samples_seen, events to log)."""
    model_def, abstract, shardings = abstract_state(cfg, mesh, tx)
    train_it = make_iter(cfg.train.seed)
    if not ckpt.steps():
        model_def, state, shardings = init_state(cfg, mesh, tx)
        return model_def, state, shardings, train_it, None, 0, []
    with parallel.activate(cfg, mesh):
        r = ckpt.restore(abstract, train_it, lambda meta: same_layout(cfg, meta))
    events = [{"event": "restored", "step": r.step,
               "skipped_unreadable": [{"step": s, "error": e, "moved_to": m}
                                      for s, e, m in r.bad_steps]}]
    samples = int(r.meta.get("samples_seen", r.step * cfg.train.batch_size))
    if not r.data_restored:
        train_it, ev = reposition(cfg, train_it, make_iter, r.step, samples, r.meta)
        events.append(ev)
    return model_def, r.state, shardings, train_it, r.step, samples, events


def reposition(cfg, it, make_iter, step: int, samples: int, meta: dict):
    """Move a fresh iterator to the global sample count (or reshuffle); returns the event."""
    old = {k: meta.get(k) for k in data_meta(cfg, 0) if k != "samples_seen"}
    new = {k: v for k, v in data_meta(cfg, 0).items() if k != "samples_seen"}
    changed = {k: [old[k], new[k]] for k in new if old[k] != new[k]}
    state = it.get_state()
    batches = samples // cfg.train.batch_size
    if isinstance(state, dict) and isinstance(state.get("next_index"), int):
        state["next_index"] = batches
        it.set_state(state)
        policy = "sample_count"
    else:
        it = make_iter(cfg.train.seed + step)
        policy = "reshuffle"
    return it, {"event": "data_reposition", "step": step, "policy": policy,
                "samples_seen": samples, "next_batch": batches,
                "exact": policy == "sample_count" and samples % cfg.train.batch_size == 0,
                "changed": changed}
