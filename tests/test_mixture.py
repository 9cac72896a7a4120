"""The mixture family: members drawn by weight, each task its member's, reproducible; bad
tables refused with the key at fault."""
from __future__ import annotations

import pytest
import torch

from metascale.errors import SpecError
from metascale.spec import load_spec, spec_from_dict

BASE = {"family": {"name": "mixture", "members": ["sine", "gaussian_mixture"], "weights": [3, 1],
                   "configs": {"sine": {"hidden": [8]}, "gaussian_mixture": {"n_train": 40, "n_val": 40}}}}


def test_members_are_drawn_by_weight_and_reproducibly():
    spec = spec_from_dict(BASE, "mix", "mix")
    sampler = spec.sampler("train", 0)
    tasks = [sampler.task(i) for i in range(400)]
    share = sum(t.config["member"] == "sine" for t in tasks) / len(tasks)
    assert abs(share - 0.75) < 0.06  # 400 draws: 3 standard deviations of a binomial share
    again = spec.sampler("train", 0).task(7)
    assert again.config == tasks[7].config and torch.equal(again.x_train, tasks[7].x_train)
    sine = next(t for t in tasks if t.config["member"] == "sine")
    assert sine.kind == "regression" and [p.shape[0] for p in sine.make_model().parameters()][:1] == [8]
    other = next(t for t in tasks if t.config["member"] == "gaussian_mixture")
    assert other.kind == "classification" and other.x_train.shape[0] == 40
    test = spec.sampler("test", 0).task(7)
    assert test.config != tasks[7].config  # meta-test draws are others


@pytest.mark.parametrize("family, needle", [
    ({"members": ["sine", "nope"], "weights": [1, 1]}, "'nope' is not a task family"),
    ({"members": ["sine"], "weights": [1, 2]}, "2 weights for 1 members"),
    ({"members": ["sine"], "weights": [1], "configs": {"digits": {}}}, "not a member"),
    ({"members": ["sine"], "weights": [1], "configs": {"sine": {"hidden": [0]}}}, "[family.configs.sine]"),
    ({"members": ["mixture"], "weights": [1]}, "'mixture' is not a task family"),
])
def test_bad_tables_are_refused(family, needle):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"family": {"name": "mixture", **family}}, "mix", "mix")
    assert needle in str(e.value)


def test_the_long_horizon_spec_loads():
    spec = load_spec("tasks/long_mixture.toml")
    assert spec.inner.horizon == 1000 and spec.meta.estimator == "pes"
    members = {spec.sampler("train", 0).task(i).config["member"] for i in range(12)}
    assert members == {"mnist", "mnist_1d", "digits"}
