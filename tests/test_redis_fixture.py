"""The suite's Redis is a real server over a real connection."""

import redis


def test_real_redis_server_answers(redis_client: redis.Redis) -> None:
    info = redis_client.info("server")
    assert "redis_version" in info
    redis_client.xadd("tempo:test", {"a": "1"})
    assert redis_client.xlen("tempo:test") == 1
