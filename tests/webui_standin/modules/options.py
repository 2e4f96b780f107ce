"""Stand-in of modules/options.py (v1.10.1): OptionInfo with its section and category, options_section, and the
settings page's categories: a section whose options name no registered category is listed under "Uncategorized"."""

from dataclasses import dataclass


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False


def options_section(section_identifier, options_dict):
    """``(id, title)`` sets the section; ``(id, title, category_id)`` the category too."""
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]
    return options_dict


class Options:
    def __init__(self):
        self.data_labels: dict[str, OptionInfo] = {}
        self.data: dict[str, object] = {"cross_attention_optimization": "Automatic"}

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        labels = self.__dict__.get("data_labels", {})
        if item in labels:
            return labels[item].default
        raise AttributeError(item)

    def reorder(self):
        """As the settings page does before it is built: each section takes the category of its first option."""
        section_categories = {}
        for item in self.data_labels.values():
            section_categories.setdefault(item.section, item.category_id)
        for item in self.data_labels.values():
            item.category_id = section_categories.get(item.section)

    def section_categories(self):
        """section title -> the heading it is listed under on the settings page (dumpjson's ``_categories``)."""
        out = {}
        for item in self.data_labels.values():
            if item.section is None or item.section[0] is None:
                continue
            category = categories.mapping.get(item.category_id)
            out.setdefault(item.section[1], "Uncategorized" if category is None else category.label)
        return out


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        if category_id not in self.mapping:
            self.mapping[category_id] = OptionsCategory(category_id, label)
        return category_id


categories = OptionsCategories()
# what modules/shared_options.py registers
for _id, _label in (("saving", "Saving images"), ("sd", "Stable Diffusion"), ("ui", "User Interface"),
                    ("system", "System"), ("postprocessing", "Postprocessing"), ("training", "Training")):
    categories.register_category(_id, _label)
