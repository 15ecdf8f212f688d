# METADATA
# title: Revalidation of a chunk of governed agents
# description: |
#   Asks agov.promotion, for every agent of input.agents against input.org,
#   whether it would be promoted now, in one query: every rule about the agent
#   applies, wherever it is written (agov.lib.spec_rules or agov.promotion);
#   the rules on who may promote do not (promotion.revalidating). A
#   missing input.org denies every agent with PROMOTION_DENY_BUDGET_EXCEEDS_LIMIT.
# scope: package
# schemas:
#   - input: schema.revalidation_input
package agov.revalidation

import data.agov.lib.spec_rules
import data.agov.promotion

# The actor and role that proofs re-signed by a revalidation name.
_actor := {"id": "agov-revalidation", "role": "system"}

# An object comprehension, not a rule `results[id] := ... if`: OPA checks each
# key of a partial object rule against every key before it (quadratic in the
# chunk size). `with input` per agent is the point: each agent is judged by the
# promotion rules as they are written, over input.agent, as a promotion is.

# METADATA
# title: Revalidation results
# description: |
#   The engine queries POST /v1/data/agov/revalidation/results and gets an
#   object agent id -> {"allow": bool, "deny": [...], "warn": [...]}: the
#   promotion decision for that agent. An entry whose id is not a non-empty
#   string has no result: the engine must treat every id it sent and got no
#   result for as denied. Duplicate ids with different results are an
#   evaluation error (fail closed).
# entrypoint: true
# schemas:
#   - input: schema.revalidation_input
results := {entry.id: verdict | # regal ignore:prefer-set-or-object-rule
	some entry in input.agents
	is_object(entry)
	is_string(entry.id)
	entry.id != ""

	# regal ignore:with-outside-test-context,comprehension-term-assignment
	verdict := promotion.decision with input as _request(entry) with promotion.revalidating as true
}

# The promotion input for one entry; what the chunk lacks stays out, so that
# the promotion rules deny it.
_request(entry) := object.union(_request_base, {"agent": object.get(entry, "agent", null)})

# The part of every request that is the same for the whole chunk, computed once.
_request_base := object.union(object.filter(input, {"org", "policy_hash", "now"}), {"actor": _actor})

# METADATA
# title: Trial failures
# description: |
#   Why this policy would judge agents of input.agents otherwise than its own
#   rules say: one message per agent whose findings the fast paths of
#   agov.lib.spec_rules skip (spec_rules.skipped_findings). A reload queries
#   it with results on the first chunk of governed agents, and refuses a
#   policy for which it is not empty, while the old policy stays in force.
# schemas:
#   - input: schema.revalidation_input
trial_failures contains message if {
	org := object.get(input, "org", null)
	some entry in input.agents
	is_object(entry)
	skipped := spec_rules.skipped_findings(object.get(entry, "agent", null), org)
	count(skipped) > 0
	message := sprintf("agent %s: %v %s", [
		json.marshal(object.get(entry, "id", null)),
		sort({f.code | some f in skipped}),
		_skipped_hint,
	])
}

_skipped_hint := concat(" ", [
	"found by the full rules of agov.lib.spec_rules (_denials, _warnings),",
	"skipped by the fast path of deny_for or warn_for: put the check there too",
])
