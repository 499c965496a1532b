import pytest

from hqlabel.jobs.resources import MIN_OBJECT_STORE_BYTES, object_store_limit, plan_resources, plan_training


@pytest.mark.parametrize("cpus", [2, 3, 4, 8, 16, 64])
def test_cpu_plans_leave_room_for_io_tasks(cpus):
    plan = plan_resources(cpus, 0)
    assert plan.num_actors >= 1 and plan.actor_gpus == 0
    assert cpus - plan.num_actors * plan.actor_cpus >= 1, "read/decode/write tasks need a free CPU"
    assert plan.task_cpus != plan.actor_cpus  # keeps decoding out of the model actors


def test_two_cpus_give_one_actor_that_also_uses_the_io_cpu_for_torch():
    plan = plan_resources(2, 0)
    assert (plan.num_actors, plan.actor_cpus, plan.actor_threads) == (1, 1.0, 2)


@pytest.mark.parametrize("cpus", [8, 16, 64])
def test_larger_machines_keep_their_io_cpus(cpus):
    plan = plan_resources(cpus, 0)
    assert plan.actor_threads == int(plan.actor_cpus)
    assert plan_resources(4, 0, num_workers=3).actor_threads == 1  # several actors: no oversubscription


def test_gpu_actors_use_one_thread():
    assert plan_resources(16, 4).actor_threads == 1


def test_requested_workers_are_capped_by_cpus():
    assert plan_resources(4, 0, num_workers=10).num_actors == 3
    assert plan_resources(16, 0, num_workers=2).num_actors == 2


def test_gpu_plan_is_one_actor_per_gpu():
    plan = plan_resources(16, 4)
    assert (plan.num_actors, plan.actor_gpus) == (4, 1.0)
    assert plan_resources(16, 4, num_workers=2).num_actors == 2
    with pytest.raises(ValueError, match="GPU"):
        plan_resources(16, 2, num_workers=3)


def test_one_cpu_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--num-cpus"):
        plan_resources(1, 0)


def test_plan_training():
    plan = plan_training(2, 0, 2, None)
    assert (plan.workers, plan.cpus, plan.gpus) == (2, 1.0, 0.0)
    plan = plan_training(16, 4, None, None)
    assert (plan.workers, plan.cpus, plan.gpus) == (4, 4.0, 1.0)
    assert plan_training(8, 0, None, None).workers == 1
    with pytest.raises(ValueError, match="GPUs"):
        plan_training(16, 2, 3, 1)
    with pytest.raises(ValueError, match="--workers"):
        plan_training(2, 0, 3, None)


def test_object_store_limit_is_a_few_batches_per_actor():
    one_gpu, four_gpus = plan_resources(8, 1), plan_resources(32, 4)
    batch = 8 * 1333 * 1333 * 3  # 8 images at the largest working size
    assert object_store_limit(one_gpu, 8, 1333) == 4 * batch
    assert object_store_limit(four_gpus, 8, 1333) == 4 * object_store_limit(one_gpu, 8, 1333)
    assert object_store_limit(one_gpu, 1, 64) == MIN_OBJECT_STORE_BYTES  # never below the floor
