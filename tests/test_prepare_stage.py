"""A stage prepared in the background (train/loop.py `prepare_stage`: its initial state and
compiled step built while the stage before it trains) trains exactly as one built in place."""
import concurrent.futures
import dataclasses
import logging

import numpy as np
from test_faults import Stage, assert_states_equal

from imagen_jax.train.loop import prepare_stage, train_stage


def test_prepared_stage_trains_bit_for_bit_like_one_built_in_place(tmp_path, caplog):
  stage = Stage()
  plain = stage.train(tmp_path / "plain", 2)

  spec = dataclasses.replace(stage.spec, train=dataclasses.replace(stage.spec.train,
                                                                   num_steps=2))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(prepare_stage, spec, mesh=stage.mesh, rules=stage.rules,
                         text_encoder=stage.encoder, text_params=stage.text_params, seed=0,
                         max_length=stage.max_length)
    started = []
    sample = dict(stage.batch(0), caption=np.asarray([b"x"] * spec.train.batch_size))
    # Name absl's logger: an earlier test that parsed absl flags may have left it at WARNING.
    with caplog.at_level(logging.INFO, logger="absl"):
      prepared = train_stage(
          spec, workdir=str(tmp_path / "prepared"), mesh=stage.mesh, rules=stage.rules,
          text_encoder=stage.encoder, text_params=stage.text_params,
          make_batches=stage.batches, sample_batch=sample, seed=0,
          max_length=stage.max_length, prepared=future, on_started=lambda: started.append(1))
  assert started == [1]  # called once, after the first step
  assert "prepared in the background" in caplog.text
  assert "train step compiled" not in caplog.text  # the background compile was used
  assert int(prepared.step) == 2
  assert_states_equal(plain, prepared)
