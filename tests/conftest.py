import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFLENS_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder("flux" | "sd3" | "pixart" | "dit"): a tiny random pipeline saved once per session."""
    made = {}

    def get(family: str):
        if family not in made:
            import tiny_pipelines as tp

            build = {"flux": tp.flux_pipeline, "sd3": tp.sd3_pipeline, "pixart": tp.pixart_pipeline,
                     "dit": tp.dit_pipeline}[family]
            made[family] = tp.save(build(), tmp_path_factory.mktemp(f"tiny_{family}") / family)
        return made[family]

    return get
