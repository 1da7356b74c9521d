"""A non-editable install (a wheel in a read-only site-packages, run from another directory): every data file the
package reads by path is in what setup.py installs, and the installed copy finds them without the checkout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """What a wheel would install (setup.py's build_py: packages + package_data), built from a copy of the
    checkout so the checkout gets no build/ or egg-info."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, lib = tmp / "src", tmp / "env" / "site-packages"
    src.mkdir()
    shutil.copy(SOURCE / "setup.py", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("vlscale", "ds_configs"):
        shutil.copytree(SOURCE / folder, src / folder, ignore=ignore)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib


def test_the_install_holds_every_data_file_of_the_package(installed):
    """ds_configs/ was not in the wheel: a wheel user's train.py without --deepspeed (and every preset naming
    ds_configs/zero2.json) stopped with "DeepSpeed config file '.../site-packages/ds_configs/zero3.json' does not
    exist"; assets/, configs/ and registry/ must stay in it too."""
    data = {p.relative_to(SOURCE) for p in (SOURCE / "vlscale").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    data |= {Path("vlscale", "ds_configs", p.name) for p in (SOURCE / "ds_configs").glob("*.json")}
    got = {p.relative_to(installed) for p in installed.rglob("*") if p.is_file()}
    assert sorted(map(str, data - got)) == []


def test_the_installed_copy_finds_the_shipped_deepspeed_files(installed, tmp_path):
    """From another directory, with the checkout out of reach: the default DeepSpeed file, a relative
    ``ds_configs/...`` (--deepspeed) and a preset's train.deepspeed are the package's files."""
    code = """if True:
        import json, vlscale
        from vlscale.config import load_config
        from vlscale.engine.deepspeed_config import default_ds_file, load_ds_file, resolve_ds_file
        files = [default_ds_file(load_config()), resolve_ds_file("ds_configs/zero3_offload.json"),
                 default_ds_file(load_config("scale/clip_t5_11b_single_adapter"))]
        for f in files:
            load_ds_file(f)
        print(json.dumps({"package": vlscale.__file__, "files": files}))
    """
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"] == str(installed / "vlscale" / "__init__.py")
    shipped = installed / "vlscale" / "ds_configs"
    assert out["files"] == [str(shipped / n) for n in ("zero3.json", "zero3_offload.json", "zero2.json")]


def test_replicate_runs_the_launchers_beside_it_not_beside_the_installed_package(launcher, monkeypatch, capsys,
                                                                                  tmp_path):
    """With vlscale installed from a wheel, vlscale.replicate built its rows' commands from its own location:
    ``.../site-packages/launchers/train.py --deepspeed .../site-packages/ds_configs/zero2.json``, files that are not
    there. The rows now run the checkout's launchers that launchers/replicate.py is in."""
    import vlscale.replicate

    installed = tmp_path / "site-packages"
    monkeypatch.setattr(vlscale.replicate, "ROOT", installed)  # where a wheel puts it
    assert launcher("replicate").main(["--table", "5", "--methods", "single_adapter", "--dry-run",
                                       "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"{SOURCE / 'launchers' / 'train.py'} --deepspeed {SOURCE / 'ds_configs' / 'zero2.json'}" in printed
    assert str(installed) not in printed
