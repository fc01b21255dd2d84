"""Write a copy of asv.conf.json whose results and HTML report go to another folder.

    python asv_bench/scratch_conf.py FOLDER [BRANCH]   # writes FOLDER/asv.conf.json, prints its path

The regression gate and the tests run asv with such a copy, so that their results never mix with
the history in asv_bench/.asv/results.  Every path in the copy is absolute: asv may run from
anywhere with ``--config FOLDER/asv.conf.json``.  The copy's branch is BRANCH (default ``HEAD``,
any revision): "main" need not exist locally, and a CI checkout of a pull request lacks it.
"""

import json
import os
import sys

from asv.util import load_json

HERE = os.path.dirname(os.path.abspath(__file__))


def write(folder: str, branch: str = "HEAD") -> str:
    conf = load_json(os.path.join(HERE, "asv.conf.json"), js_comments=True)
    for key in ("repo", "benchmark_dir", "env_dir"):
        conf[key] = os.path.normpath(os.path.join(HERE, conf[key]))
    conf["results_dir"] = os.path.join(os.path.abspath(folder), "results")
    conf["html_dir"] = os.path.join(os.path.abspath(folder), "html")
    conf["branches"] = [branch]
    path = os.path.join(folder, "asv.conf.json")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(conf, f, indent=1)
    return path


if __name__ == "__main__":
    print(write(*sys.argv[1:3]))
