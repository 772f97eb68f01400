"""What git tracks: sources and configs, never generated or binary files (they would also go up with
every `ray job submit --working-dir .`)."""
import subprocess

from ray_apps.config import PROJECT_ROOT


def test_no_tracked_file_is_over_500_kb():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    sizes = {name: (PROJECT_ROOT / name).stat().st_size for name in files.decode().split("\0")
             if name and (PROJECT_ROOT / name).is_file()}
    assert sizes, "git ls-files listed nothing"
    assert {n: s for n, s in sizes.items() if s > 500 * 1024} == {}
