"""The kept Kafka log's size, walked while a live broker renames and deletes its files."""

from __future__ import annotations

import os

from din.stack.brokers import KafkaStore


def test_size_counts_every_file_under_the_log(tmp_path):
    store = KafkaStore(tmp_path)
    assert store.size_bytes() == 0
    (store.log_dir / "topic-0").mkdir(parents=True)
    (store.log_dir / "topic-0" / "00.log").write_bytes(b"x" * 100)
    (store.log_dir / "meta.properties").write_bytes(b"y" * 7)
    assert store.size_bytes() == 107


def test_a_file_deleted_during_the_walk_is_skipped(tmp_path, monkeypatch):
    store = KafkaStore(tmp_path)
    (store.log_dir / "topic-0").mkdir(parents=True)
    (store.log_dir / "topic-0" / "00.log").write_bytes(b"x" * 100)
    (store.log_dir / "topic-0" / "leader-epoch-checkpoint.tmp").write_bytes(b"z" * 5)
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert store.size_bytes() == 100
