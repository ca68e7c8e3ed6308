"""End-to-end benchmark: ours vs transformers and vs the physical floors, per batch size (see
internvl_engine/bench/e2e.py for the flags, the method and the JSON record; `internvl-engine bench` is the same).

    python benchmarks/e2e.py --model random:internvl3-1b --device cuda --tiles 1 --batch 1,8,64 --baseline hf \
        --json out.json"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from internvl_engine.bench.e2e import main  # noqa: E402

if __name__ == "__main__":
    main()
