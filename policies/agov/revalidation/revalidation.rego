# METADATA
# title: Revalidation of a chunk of governed agents
# description: |
#   Applies agov.lib.spec_rules to every agent of input.agents against
#   input.org, in one query. A missing input.org denies every agent with
#   PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT.
# scope: package
# schemas:
#   - input: schema.revalidation_input
package agov.revalidation

import data.agov.lib.spec_rules

default _org := null

_org := input.org

default _agent(_) := null

_agent(entry) := entry.agent

# METADATA
# title: Revalidation results
# description: |
#   The engine queries POST /v1/data/agov/revalidation/results and gets an
#   object agent id -> {"allow": bool, "deny": [...], "warn": [...]}.
#   An entry whose id is not a non-empty string has no result: the engine
#   must treat every id it sent and got no result for as denied. Duplicate
#   ids with different results are an evaluation error (fail closed).
# entrypoint: true
# schemas:
#   - input: schema.revalidation_input
results[id] := {"allow": count(findings[0]) == 0, "deny": findings[0], "warn": findings[1]} if {
	some entry in input.agents
	id := entry.id
	is_string(id)
	id != ""

	# spec_rules reads input.agent and input.org, so evaluating it once per
	# agent needs a different input each time; only `with` gives that. One
	# `with` for deny and warn together lets them share the per-agent cache.
	# regal ignore:with-outside-test-context
	findings := [spec_rules.deny, spec_rules.warn] with input as {"agent": _agent(entry), "org": _org}
}
