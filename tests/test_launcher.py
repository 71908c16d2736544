"""The launcher's argument handling (no server)."""

from kvflow.launch_server import EMBEDDED_MODEL_PATH, flag_value, with_defaults


def test_defaults_select_kvflow_the_embedded_model_and_the_cpu_engine():
    argv = with_defaults(["--port", "1"], cuda=False)
    assert (
        flag_value(argv, "--model-path") == EMBEDDED_MODEL_PATH
        and flag_value(argv, "--load-format") == "dummy"
    )
    assert flag_value(argv, "--radix-cache-backend") == "kvflow"
    assert flag_value(argv, "--radix-eviction-policy") == "kvflow"
    assert flag_value(argv, "--device") == "cpu" and flag_value(argv, "--attention-backend") == "torch_native"
    assert "--sleep-on-idle" in argv


def test_user_flags_win_and_gpu_machines_get_no_cpu_settings():
    argv = with_defaults(
        ["--model-path", "/m", "--radix-eviction-policy=lru", "--dtype", "bfloat16"], cuda=True
    )
    assert flag_value(argv, "--model-path") == "/m" and flag_value(argv, "--load-format") is None
    assert flag_value(argv, "--radix-eviction-policy") == "lru"
    assert flag_value(argv, "--dtype") == "bfloat16"
    assert flag_value(argv, "--device") is None and "--sleep-on-idle" not in argv


def test_stock_backend_keeps_sglangs_default_policy():
    argv = with_defaults(["--radix-cache-backend", "stock"], cuda=True)
    assert flag_value(argv, "--radix-cache-backend") == "stock"
    assert flag_value(argv, "--radix-eviction-policy") is None


def test_hicache_on_cpu_gets_the_direct_layer_first_host_tier_unless_given():
    for enable in ("--enable-hierarchical-cache", "--enable-hicache"):
        argv = with_defaults([enable, "--hicache-ratio", "4"], cuda=False)
        assert flag_value(argv, "--hicache-io-backend") == "direct"
        assert flag_value(argv, "--hicache-mem-layout") == "layer_first"
    argv = with_defaults(["--enable-hicache", "--hicache-mem-layout=page_first_direct"], cuda=False)
    assert flag_value(argv, "--hicache-mem-layout") == "page_first_direct"
    assert argv.count("--hicache-mem-layout") == 0 and flag_value(argv, "--hicache-io-backend") == "direct"
    # Without HiCache, or on a GPU machine, SGLang's own HiCache defaults stay.
    assert flag_value(with_defaults([], cuda=False), "--hicache-io-backend") is None
    argv = with_defaults(["--enable-hierarchical-cache"], cuda=True)
    assert (
        flag_value(argv, "--hicache-io-backend") is None and flag_value(argv, "--hicache-mem-layout") is None
    )
