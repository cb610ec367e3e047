"""Command-line checks of the GPU benchmark scripts that need no GPU (bad arguments fail before any work)."""
import pytest

from benchmarks import gpu_dali


@pytest.mark.parametrize("sections", ["throughput,speed", ","])
def test_dali_benchmark_rejects_unknown_sections(sections, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_dali.main(["--sections", sections])
    assert e.value.code == 2
    assert "choose from checks, throughput, data_wait" in capsys.readouterr().err
