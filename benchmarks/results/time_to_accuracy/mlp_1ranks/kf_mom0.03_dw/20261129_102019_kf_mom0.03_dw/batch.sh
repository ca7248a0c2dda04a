#!/bin/bash

cd /work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_dw/20261129_102019_kf_mom0.03_dw || exit 1
export KFAC_LAUNCHED=1
export PYTHONUNBUFFERED=1
echo "Started at $(date)"
/work/main/.venv/bin/python /work/main/kfac.py model=mlp optimizer=momentum optimizer.learning_rate=0.03 kfac.enabled=true 'kfac.damping_act=[0.3,0.01]' 'kfac.damping_err=[1.0]' kfac.update_interval_init=1 kfac.update_interval_target=10 kfac.update_interval_steps=200 kfac.compute_interval_steps=50 kfac.kronecker_decay=0.95 launcher.nodes=1 launcher.procs_per_node=1 trainer.epochs=3 trainer.test_every_steps=100 trainer.stop_at_test_accuracy=98.0 trainer.progress=false launcher.experiment_dir=/work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_dw launcher.job_name=kf_mom0.03_dw hydra.run.dir=/work/main/benchmarks/results/time_to_accuracy/mlp_1ranks/kf_mom0.03_dw/20261129_102019_kf_mom0.03_dw hydra.output_subdir=null
status=$?
echo "Finished at $(date) with status $status"
exit $status
