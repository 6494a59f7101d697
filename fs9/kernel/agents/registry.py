"""What the registry shows (`registry/`): what each agent offers, who provides a
capability, who owns which vault subtree; each agent as an A2A AgentCard. Rendered
from the manifests, as text."""
import json

from ... import __version__
from . import manifest as manifests

A2A_PROTOCOL = "1.0"  # the A2A version whose AgentCard field names `card` uses


def entry(agent) -> str:
    """What an agent offers, as KEY=VALUE lines (a key repeats for each item)."""
    m = agent.manifest
    lines = [f"name={agent.name}", f"state={agent.state}", f"mode={m['mode']}",
             f"clearance={m['clearance']}", f"net={manifests.reach(m)}"]
    lines += [f"provides={cap}" for cap in m.get("provides", [])]
    lines += [f"accepts={kind}" for kind in m.get("accepts", ["work_request"])]
    if "sla" in m:
        lines += [f"sla={m['sla']}"]
    lines += [f"owns={subtree}" for subtree in m.get("owns", [])]
    if "description" in m:
        lines += [f"description={m['description']}"]
    return "\n".join(lines) + "\n"


def card(agent) -> str:
    """What an agent offers as an A2A AgentCard (JSON, A2A's field names): one skill per
    capability it `provides`, tagged with the message types it `accepts`. Its address
    is its mailbox in the mount: A2A clients reach it through a gateway, never directly."""
    m = agent.manifest
    accepts = m.get("accepts", ["work_request"])
    about = m.get("description", f"fs9 agent {agent.name}")
    if "sla" in m:
        about += f" (sla: {m['sla']})"
    skills = [{"id": cap, "name": cap, "description": f"{cap}, by {agent.name}: {about}",
               "tags": [cap, *accepts]} for cap in m.get("provides", [])]
    return json.dumps(a2a_card(agent.name, about, f"fs9:agents/{agent.name}/mail/new", "JSONRPC",
                               skills), indent=2) + "\n"


def a2a_card(name: str, description: str, url: str, binding: str, skills: list[dict],
             extensions: list[dict] = ()) -> dict:
    """An A2A AgentCard with A2A's field names only (the SDK's AgentCard refuses any
    other): an agent's (registry/cards/NAME) and an OS's (federation/card) alike. fs9's
    own fields go in `capabilities.extensions`, as A2A extensions (uri, params)."""
    capabilities = {"streaming": False, "pushNotifications": False}
    if extensions:
        capabilities["extensions"] = list(extensions)
    return {"name": name, "description": description,
            "supportedInterfaces": [{"url": url, "protocolBinding": binding,
                                     "protocolVersion": A2A_PROTOCOL}],
            "version": __version__, "capabilities": capabilities,
            "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
            "skills": skills}


def owners(agents: dict) -> str:
    """Who owns which vault subtree: `SUBTREE OWNER CLASSIFICATION` lines, sorted."""
    rows = sorted((subtree, name, a.manifest["clearance"])
                  for name, a in agents.items() for subtree in a.manifest.get("owns", []))
    return "".join(f"{sub} {name} {cls}\n" for sub, name, cls in rows)


def providers(agents: dict) -> dict[str, list[str]]:
    """capability -> the agents providing it, by name."""
    caps: dict[str, list[str]] = {}
    for name in sorted(agents):
        for cap in agents[name].manifest.get("provides", []):
            caps.setdefault(cap, []).append(name)
    return caps


def providers_text(agents: dict, cap: str) -> str:
    return "".join(f"{name}\n" for name in providers(agents).get(cap, []))
