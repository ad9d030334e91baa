"""sysfs: counters, settings and overrides against a fake transparent_hugepage tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from khmon.errors import KhmonError
from khmon.kernel.sysfs import (
    counter_delta,
    khugepaged_pid,
    override,
    read_counters,
    read_settings,
    selected,
)

# The shapes of the real files (6.18 host / 7.2 guest), with made-up numbers.
TREE = {
    "enabled": "always [madvise] never\n",
    "defrag": "always defer defer+madvise [madvise] never\n",
    "use_zero_page": "1\n",
    "shmem_enabled": "always within_size advise [never] deny force\n",
    "khugepaged/scan_sleep_millisecs": "10000\n",
    "khugepaged/pages_to_scan": "4096\n",
    "khugepaged/max_ptes_none": "511\n",
    "khugepaged/defrag": "1\n",
    "khugepaged/pages_collapsed": "17\n",
    "khugepaged/full_scans": "42\n",
    "hugepages-8kB/enabled": "always inherit madvise [never]\n",  # no stats dir
    "hugepages-64kB/enabled": "always inherit madvise [never]\n",
    "hugepages-64kB/stats/collapse_alloc": "1824\n",
    "hugepages-64kB/stats/collapse_alloc_failed": "0\n",
    "hugepages-64kB/stats/collapse_exceed_none_pte": "5\n",
    "hugepages-2048kB/enabled": "always [inherit] madvise never\n",
    "hugepages-2048kB/stats/collapse_alloc": "58\n",
    "hugepages-2048kB/stats/not_a_number": "n/a\n",
}
VMSTAT = ("nr_free_pages 1000\nthp_fault_alloc 3\nthp_collapse_alloc 58\n"
          "thp_collapse_alloc_failed 0\npgfault 99\nthp_scan_exceed_none_pte 12\n")


@pytest.fixture
def thp(tmp_path: Path) -> Path:
    root = tmp_path / "transparent_hugepage"
    for rel, text in TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def vmstat(tmp_path: Path) -> Path:
    p = tmp_path / "vmstat"
    p.write_text(VMSTAT)
    return p


def test_read_counters(thp: Path, vmstat: Path) -> None:
    c = read_counters(thp, vmstat)
    assert c == {
        "thp_fault_alloc": 3, "thp_collapse_alloc": 58, "thp_collapse_alloc_failed": 0,
        "thp_scan_exceed_none_pte": 12,
        "khugepaged/pages_collapsed": 17, "khugepaged/full_scans": 42,
        "hugepages-64kB/collapse_alloc": 1824, "hugepages-64kB/collapse_alloc_failed": 0,
        "hugepages-64kB/collapse_exceed_none_pte": 5,
        "hugepages-2048kB/collapse_alloc": 58,
    }
    # sizes in numeric order (64 before 2048), not string order
    sizes = [k.split("/")[0] for k in c if k.startswith("hugepages-")]
    assert sizes.index("hugepages-64kB") < sizes.index("hugepages-2048kB")


def test_read_counters_without_files(tmp_path: Path) -> None:
    assert read_counters(tmp_path / "none", tmp_path / "no_vmstat") == {}


def test_read_settings(thp: Path) -> None:
    assert read_settings(thp) == {
        "enabled": "always [madvise] never",
        "defrag": "always defer defer+madvise [madvise] never",
        "use_zero_page": "1",
        "shmem_enabled": "always within_size advise [never] deny force",
        "khugepaged/defrag": "1",
        "khugepaged/max_ptes_none": "511",
        "khugepaged/pages_to_scan": "4096",
        "khugepaged/scan_sleep_millisecs": "10000",
        "hugepages-8kB/enabled": "always inherit madvise [never]",
        "hugepages-64kB/enabled": "always inherit madvise [never]",
        "hugepages-2048kB/enabled": "always [inherit] madvise never",
    }


def test_counter_delta() -> None:
    start = {"a": 1, "b": 5, "gone": 3}
    end = {"a": 4, "b": 5, "new": 1}
    assert counter_delta(start, end) == {"a": 3, "b": 0}
    assert counter_delta({}, end) == {}


@pytest.mark.parametrize(("text", "choice"), [
    ("always [madvise] never", "madvise"),
    ("[always] madvise never", "always"),
    ("always inherit madvise [never]", "never"),
    ("511", "511"),
])
def test_selected(text: str, choice: str) -> None:
    assert selected(text) == choice


def _text(thp: Path, rel: str) -> str:
    return (thp / rel).read_text()


def test_override_writes_and_restores(thp: Path) -> None:
    knobs = {"enabled": "never", "khugepaged/scan_sleep_millisecs": "100",
             "hugepages-64kB/enabled": "inherit"}
    with override(knobs, thp) as saved:
        assert saved == {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "10000",
                         "hugepages-64kB/enabled": "never"}
        assert _text(thp, "enabled") == "never"
        assert _text(thp, "khugepaged/scan_sleep_millisecs") == "100"
        assert _text(thp, "hugepages-64kB/enabled") == "inherit"
    # the kernel takes the bare choice back, not the bracketed list
    assert _text(thp, "enabled") == "madvise"
    assert _text(thp, "khugepaged/scan_sleep_millisecs") == "10000"
    assert _text(thp, "hugepages-64kB/enabled") == "never"
    assert _text(thp, "khugepaged/max_ptes_none") == "511\n"  # untouched


def test_override_restores_when_the_body_raises(thp: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), \
            override({"enabled": "always", "khugepaged/max_ptes_none": "0"}, thp):
        assert _text(thp, "khugepaged/max_ptes_none") == "0"
        raise RuntimeError("boom")
    assert _text(thp, "enabled") == "madvise"
    assert _text(thp, "khugepaged/max_ptes_none") == "511"


def test_override_missing_setting_restores_earlier_ones(thp: Path) -> None:
    body_ran = False
    with pytest.raises(KhmonError) as e, \
            override({"enabled": "never", "khugepaged/no_such_knob": "1"}, thp):
        body_ran = True
    assert not body_ran
    assert "no_such_knob" in str(e.value) and "does not exist" in str(e.value)
    assert _text(thp, "enabled") == "madvise"
    assert not (thp / "khugepaged/no_such_knob").exists()


def test_override_write_failure(thp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def write_text(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if self.name == "max_ptes_none" and data == "0":
            raise PermissionError(13, "Permission denied")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KhmonError) as e, \
            override({"enabled": "never", "khugepaged/max_ptes_none": "0"}, thp):
        pass
    assert "cannot write '0'" in str(e.value) and "Permission denied" in str(e.value)
    assert _text(thp, "enabled") == "madvise"
    assert _text(thp, "khugepaged/max_ptes_none") == "511"


def test_khugepaged_pid(tmp_path: Path) -> None:
    """The kernel thread by its comm; entries that vanish or are not processes are skipped."""
    for pid, comm in ((1, "systemd"), (57, "khugepaged"), (90, "khugepaged-x")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "200").mkdir()  # exited between listing and reading: no comm
    assert khugepaged_pid(tmp_path) == 57
    (tmp_path / "57" / "comm").unlink()
    assert khugepaged_pid(tmp_path) is None
