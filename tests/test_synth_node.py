"""The generator's output is real DICOM that the node accepts from DCMTK storescu."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import storescu
from tests.peers import wait_for
from tests.test_node_e2e import series_row
from training.manifest import read_manifest
from training.synth import SynthConfig, generate

pytestmark = pytest.mark.slow


def test_generated_series_is_received_and_decided(tmp_path: Path, node_factory) -> None:
    manifest = generate(
        SynthConfig(subjects=1, slices_per_subject=(6, 6), size=128, seed=3, workers=1),
        tmp_path / "synth",
        progress=False,
    )
    records = read_manifest(manifest)
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    node = node_factory(db_url)
    storescu(node.port, [r.path for r in records])
    uid = records[0].series_uid
    series = wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided" and s)
    assert series.received_instances == len(records) == 6
    assert series.expected_slices == 6  # the generator announces ImagesInAcquisition
    assert series_row(db_url, uid)[1][-1].n_slices == 6
