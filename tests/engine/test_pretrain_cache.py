"""The pretraining cache key covers all the code that computes the cached model."""
import shutil
from pathlib import Path

from engine.pretrain import PRETRAINING_CODE, source_digest

ROOT = Path(__file__).resolve().parents[2]


def test_cache_key_changes_with_any_code_that_computes_the_model(tmp_path):
    for pattern in PRETRAINING_CODE + ("engine/report.py",):
        for f in ROOT.glob(pattern):
            (tmp_path / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / f.relative_to(ROOT))
    base = source_digest(tmp_path)
    assert base == source_digest(ROOT)
    for changed in ("models/encoder.py", "kernels/attention.py", "engine/trainer.py", "eval/synthetic/world.py"):
        path = tmp_path / changed
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert source_digest(tmp_path) != base, changed
        path.write_text(original)
    (tmp_path / "engine" / "report.py").write_text("# reporting does not change the model\n")
    assert source_digest(tmp_path) == base
