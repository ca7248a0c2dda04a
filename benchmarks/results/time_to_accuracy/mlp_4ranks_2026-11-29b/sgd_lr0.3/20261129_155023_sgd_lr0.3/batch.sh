#!/bin/bash

cd /work/main/benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/sgd_lr0.3/20261129_155023_sgd_lr0.3 || exit 1
export KFAC_LAUNCHED=1
export PYTHONUNBUFFERED=1
echo "Started at $(date)"
/work/main/.venv/bin/mpiexec -n 4 /work/main/.venv/bin/python -m mpi4py /work/main/kfac.py model=mlp optimizer=sgd optimizer.learning_rate=0.3 launcher.nodes=1 launcher.procs_per_node=4 trainer.epochs=10 trainer.test_every_steps=100 trainer.stop_at_test_accuracy=98.0 trainer.progress=false launcher.experiment_dir=benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/sgd_lr0.3 launcher.job_name=sgd_lr0.3 hydra.run.dir=/work/main/benchmarks/results/time_to_accuracy/mlp_4ranks_2026-11-29b/sgd_lr0.3/20261129_155023_sgd_lr0.3 hydra.output_subdir=null
status=$?
echo "Finished at $(date) with status $status"
exit $status
