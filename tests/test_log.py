"""The one logging setup: format, and libraries' chatter kept out of stage logs."""

import logging

from stages.core.log import remove_file_handlers, setup_logging


def test_stage_lines_are_logged_and_faiss_loader_lines_are_not(tmp_path):
    log_file = tmp_path / "train.log"
    setup_logging(log_file)
    try:
        logging.getLogger("stages.pipeline.train").info("epoch 1 done")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
        logging.getLogger("faiss.loader").warning("no faiss build for this CPU")
    finally:
        remove_file_handlers()
    lines = log_file.read_text().splitlines()
    assert [line.split(" | ")[1:] for line in lines] == [
        ["INFO", "stages.pipeline.train", "epoch 1 done"],
        ["WARNING", "faiss.loader", "no faiss build for this CPU"]]
