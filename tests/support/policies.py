"""Grant policies shared by the hook tests: a policy using every option, and an event that
carries one."""

import dataclasses

from diglett.policy import Policy

APR1 = "$apr1$diglett1$" + "b" * 22
FULL = Policy(aliases=("www.customer.test",), basic_auth=("alice:" + APR1,),
              allow=("127.0.0.1/32",), forward_auth="http://127.0.0.1:9091/check",
              middlewares=("gzip@file",))


def with_policy(ev, policy):
    return dataclasses.replace(ev, policy=policy.to_json())
