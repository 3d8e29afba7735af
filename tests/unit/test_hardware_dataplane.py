"""SmartNIC / DOCA detection and the data plane choice, against fake sysfs trees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_node import hardware
from edge_node.hardware import SmartNic, choose_dataplane, doca_gpunetio_available, find_smartnics

pytestmark = pytest.mark.unit


def _pci(root: Path, addr: str, vendor: str, cls: str, device: str = "0x101d", netdevs: tuple[str, ...] = ()) -> None:
    dev = root / "bus" / "pci" / "devices" / addr
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "class").write_text(cls + "\n")
    (dev / "device").write_text(device + "\n")
    for name in netdevs:
        (dev / "net" / name).mkdir(parents=True)


def test_finds_connectx_network_functions_only(tmp_path: Path) -> None:
    _pci(tmp_path, "0000:3b:00.0", "0x15b3", "0x020000", netdevs=("ens1f0np0",))
    _pci(tmp_path, "0000:3b:00.1", "0x15b3", "0x020000", netdevs=("ens1f1np1",))
    _pci(tmp_path, "0000:00:03.0", "0x1af4", "0x020000", netdevs=("eth0",))  # virtio NIC
    _pci(tmp_path, "0000:3c:00.0", "0x15b3", "0x080500")  # BlueField non-network function
    nics = find_smartnics(tmp_path)
    assert [n.pci_address for n in nics] == ["0000:3b:00.0", "0000:3b:00.1"]
    assert nics[0].netdevs == ("ens1f0np0",)
    assert nics[0].device_id == "0x101d"


def test_virtio_only_and_missing_tree_mean_none(tmp_path: Path) -> None:
    _pci(tmp_path, "0000:00:03.0", "0x1af4", "0x020000")
    assert find_smartnics(tmp_path) == []
    assert find_smartnics(tmp_path / "absent") == []


def test_unreadable_vendor_file_is_skipped(tmp_path: Path) -> None:
    dev = tmp_path / "bus" / "pci" / "devices" / "0000:01:00.0"
    dev.mkdir(parents=True)  # no vendor file at all
    assert find_smartnics(tmp_path) == []


def test_doca_library_not_loadable_here(monkeypatch: pytest.MonkeyPatch) -> None:
    # A nonexistent name cannot load; find_library is held to "not found" so that a machine with the
    # real DOCA library checks the same refusal instead of skipping.
    monkeypatch.setattr(hardware.ctypes.util, "find_library", lambda name: None)
    assert doca_gpunetio_available(("libdoca_gpunetio_does_not_exist.so",)) is False


def test_doca_loadable_when_dlopen_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(hardware.ctypes, "CDLL", lambda name: loaded.append(name))
    assert doca_gpunetio_available(("libdoca_gpunetio.so.2",)) is True
    assert loaded == ["libdoca_gpunetio.so.2"]


NIC = SmartNic("0000:3b:00.0", "0x101d", ("ens1f0np0",))


@pytest.mark.parametrize(
    ("gpus", "nics", "doca", "mode", "why"),
    [
        (1, [NIC], True, "gpunetio", "present"),
        (0, [NIC], True, "fast", "no CUDA GPU"),
        (1, [], True, "fast", "no SmartNIC"),
        (1, [NIC], False, "fast", "DOCA GPUNetIO library not loadable"),
        (0, [], False, "fast", "no CUDA GPU; no SmartNIC"),
    ],
)
def test_auto_needs_all_three(gpus: int, nics: list[SmartNic], doca: bool, mode: str, why: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edge_node.hardware"):
        got, reason = choose_dataplane("auto", gpus=gpus, smartnics=nics, doca=doca)
    assert got == mode
    assert why in reason
    assert reason in caplog.text


def test_auto_reads_fake_sysfs(tmp_path: Path) -> None:
    _pci(tmp_path, "0000:3b:00.0", "0x15b3", "0x020000")
    assert choose_dataplane("auto", gpus=1, doca=True, sysfs_root=tmp_path)[0] == "gpunetio"
    assert choose_dataplane("auto", gpus=1, doca=True, sysfs_root=tmp_path / "x")[0] == "fast"


def test_explicit_modes() -> None:
    assert choose_dataplane("fast", gpus=8, smartnics=[NIC], doca=True) == ("fast", "requested fast")
    assert choose_dataplane("asgi", gpus=8, smartnics=[NIC], doca=True) == ("asgi", "requested asgi")
    assert choose_dataplane("gpu", gpus=1)[0] == "gpu"
    assert choose_dataplane("gpu", gpus=0)[0] == "fast"
    assert choose_dataplane("gpunetio", gpus=1, smartnics=[NIC], doca=False)[0] == "fast"
    with pytest.raises(ValueError, match="unknown data plane"):
        choose_dataplane("rdma", gpus=1)


def test_this_machine_has_no_gpunetio() -> None:
    # Real probes: no machine of this project has DOCA, so auto must never pick gpunetio here.
    assert choose_dataplane("auto")[0] == "fast"
