"""The suite's Redis is a real server over a real connection."""

import redis


def test_real_redis_server_answers(redis_client: redis.Redis) -> None:
    info = redis_client.info("server")
    assert "redis_version" in info
    redis_client.xadd("tempo:test", {"a": "1"})
    assert redis_client.xlen("tempo:test") == 1


def test_a_users_redis_is_never_flushed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With TEMPO_REDIS_URL the tests claim an empty database and leave the others alone."""
    from tests.conftest import SENTINEL, RedisServer, claim_empty_database

    server = RedisServer(tmp_path)
    server.start()
    try:
        users = redis.Redis.from_url(server.url.rsplit("/", 1)[0] + "/15")
        users.set("their:data", "precious")
        claimed = claim_empty_database(server.url)
        assert claimed.endswith("/14")
        assert redis.Redis.from_url(claimed).get(SENTINEL) is not None
        assert claim_empty_database(server.url).endswith("/13")  # 14 is claimed (not empty) now
        assert users.get("their:data") == b"precious"
    finally:
        server.stop()
