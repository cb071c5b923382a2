"""Background shard writer: same bytes as the synchronous path, bounded queue, errors reach the caller."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from safetyneurons import _io
from safetyneurons.activations.writer import ShardWriter, to_host
from safetyneurons.activations.store import Store, extract
from builders import dir_bytes, make_records, ns_for
from tiny import tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("qwen3", 1)


@pytest.mark.parametrize("with_set", [False, True])
def test_store_bytes_equal_with_and_without_the_writer_thread(lm, tmp_path, with_set):
    recs = make_records(11, seed=3)
    kw = dict(shard_size=3, batch_size=2, dtype="float16", progress=False,
              neuron_set=ns_for(lm, layers=(0, 2, 2), indices=(1, 4, 30)) if with_set else None)
    extract(lm, recs, tmp_path / "t", writer_thread=True, **kw)
    extract(lm, recs, tmp_path / "s", writer_thread=False, **kw)
    threaded, sync = dir_bytes(tmp_path / "t"), dir_bytes(tmp_path / "s")
    assert len([n for n in threaded if n.startswith("shard-")]) == 4
    assert threaded == sync


def test_a_writer_error_reaches_the_caller_and_leaves_no_half_written_shard(lm, tmp_path, monkeypatch):
    real_replace = os.replace
    main = threading.get_ident()
    seen_threads = []

    def failing_replace(src, dst):
        seen_threads.append(threading.get_ident())
        if str(dst).endswith("shard-00001.safetensors"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", failing_replace)
    out = tmp_path / "store"
    with pytest.raises(OSError, match="No space left"):
        extract(lm, make_records(12), out, shard_size=3, batch_size=2, progress=False)
    assert any(t != main for t in seen_threads)  # the shards really were written on the writer thread
    names = sorted(p.name for p in out.iterdir())
    assert "shard-00001.safetensors" not in names and "manifest.json" not in names
    assert not [n for n in names if n.endswith(".tmp")]  # no temp file left behind
    assert "shard-00000.safetensors" in names
    assert not any(n in names for n in ("shard-00002.safetensors", "shard-00003.safetensors"))  # later jobs dropped
    monkeypatch.setattr(_io.os, "replace", real_replace)
    st = extract(lm, make_records(12), out, shard_size=3, batch_size=2, progress=False)  # resumes cleanly
    assert len(Store.load(out)) == 12 == len(st)


def test_queue_is_bounded_and_jobs_run_in_order():
    gate, ran = threading.Event(), []
    writer = ShardWriter(max_pending=2)
    writer.submit(lambda: (gate.wait(5), ran.append(0)))
    time.sleep(0.05)  # the thread has taken job 0 and waits on the gate
    writer.submit(lambda: ran.append(1))
    writer.submit(lambda: ran.append(2))
    blocked = threading.Thread(target=writer.submit, args=(lambda: ran.append(3),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a third waiting job must wait for room: memory stays bounded
    gate.set()
    blocked.join(5)
    writer.close()
    assert ran == [0, 1, 2, 3]


def test_host_batch_on_cpu_holds_the_values():
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    np.testing.assert_array_equal(to_host(t).numpy(), t.numpy())
