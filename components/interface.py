"""What a component exposes, for the interface tests in each component's folder."""

from kfp.dsl.base_component import BaseComponent


def interface(component: BaseComponent) -> tuple[dict[str, str], dict[str, str], str]:
    """(input name → type, output name → type, image) as the compiled spec has them."""
    spec = component.component_spec
    inputs = {name: str(i.type) for name, i in (spec.inputs or {}).items()}
    outputs = {name: str(o.type) for name, o in (spec.outputs or {}).items()}
    return inputs, outputs, spec.implementation.container.image
