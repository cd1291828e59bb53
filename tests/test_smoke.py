from tests.conftest import register


async def test_register_and_me(server):
    async with await server.connect() as c:
        s = await register(c, name="Ann")
        me = await c.call("users.me")
        assert me["id"] == s["user"]["id"]
        assert me["balance"] == "0.00"
        assert me["kyc_status"] == "pending"
