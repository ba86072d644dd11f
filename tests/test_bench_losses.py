"""``largefr bench losses``: every member is a valid recipe of the same images and backbone, differing in
the loss only; the table prints every row. (Training itself: run the bench, see README.)"""
from __future__ import annotations

from pathlib import Path

from largefr.bench.losses import MEMBERS, LossBenchRow, format_table, member_config, member_overrides


def test_members_differ_only_in_the_loss(tmp_path: Path) -> None:
    configs = {m: member_config(m, member_overrides(m, tmp_path / "data", tmp_path / m, 50)) for m in MEMBERS}
    classic = {"softmax", "normface", "lsoftmax", "sphereface", "cosface", "arcface", "combined",
               "contrastive", "triplet", "softmax+center"}
    modern = {"curricularface", "adaface", "magface", "subcenter_arcface", "elastic_arcface", "elastic_cosface"}
    assert set(MEMBERS) == classic | modern
    reference = configs["cosface"]
    for member, cfg in configs.items():
        images = cfg.train.batch_size * cfg.schedule.total_steps
        assert images == reference.train.batch_size * reference.schedule.total_steps, member
        assert (cfg.model, cfg.optim, cfg.train.seed) == (reference.model, reference.optim, reference.train.seed), member
        assert cfg.output_dir == str(tmp_path / member)
    assert [t.type for t in configs["triplet"].loss] == ["triplet"] and configs["triplet"].data.sampler == "pk"
    assert [t.type for t in configs["softmax+center"].loss] == ["margin_softmax", "center"]
    margins = {cfg.head.margin for m, cfg in configs.items() if m not in ("contrastive", "triplet", "softmax+center")}
    assert len(margins) == 7 + len(modern)  # each margin member trains its own margin


def test_table_has_a_row_per_member() -> None:
    rows = [LossBenchRow("triplet", 10, 320, 0.91, 0.29, 50.0, 0.5, 12.0),
            LossBenchRow("cosface", 10, 320, 0.93, 0.31, 80.0, 3.2, 10.0)]
    table = format_table(rows, 0.62).splitlines()
    assert table[0] == "untrained: 0.620" and len(table) == 4
    assert table[2].split()[:5] == ["triplet", "10", "320", "0.910", "+0.290"]


def test_user_overrides_apply_to_every_member_last(tmp_path: Path) -> None:
    for member in ("softmax", "triplet"):
        overrides = member_overrides(member, tmp_path / "data", tmp_path / member, 50, ("train.precision=fp32",))
        assert overrides[-1] == "train.precision=fp32"
        assert member_config(member, overrides).train.precision == "fp32"
