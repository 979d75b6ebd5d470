// crd-apiserver: the upstream k8s.io/apiextensions-apiserver (the CRD and custom-resource server
// inside kube-apiserver, backed by etcd) run on its own, so that shipyard's tests create RayJobs
// against the real openAPI and CEL validation, pruning, server-side apply and /status code.
//
// The stock binary cannot run alone: it delegates authentication, authorization, admission and
// API priority-and-fairness to a core kube-apiserver and exits when there is none. This wrapper
// keeps everything else upstream and changes only that (public upstream APIs only):
//
//   - no CoreAPI, Admission or priority-and-fairness options (each needs a core API server);
//   - the delegated-auth kubeconfigs are optional, so authentication is x509 client certs alone
//     (--client-ca-file) and authorization lets only the group system:masters through (the
//     delegated authorizer's always-allowed group): a cert in any other group gets 403, which is
//     how tests see a forbidden request;
//   - the config is built without a shared informer factory (options.Config() dereferences the
//     nil one when CoreAPI is off);
//   - /apis discovery is on and lists established CRD groups (kube-aggregator does both in a
//     real control plane; the Python DynamicClient and kubectl need them);
//   - /openapi/v2 and /openapi/v3 are served (client-side validation falls back to them).
//
// --allow-all turns authentication and authorization off (a quick local trial only).
// The version reported by /version is stamped at build time (deploy/k8s-api.sh, -ldflags).
package main

import (
	"fmt"
	"net"
	"os"
	"sort"

	"github.com/spf13/pflag"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/version"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	netutils "k8s.io/utils/net"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, "crd-apiserver:", err)
	os.Exit(1)
}

func main() {
	ctx := genericapiserver.SetupSignalContext()
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	ro := o.RecommendedOptions
	ro.Authentication.RemoteKubeConfigFileOptional = true
	ro.Authorization.RemoteKubeConfigFileOptional = true

	fs := pflag.NewFlagSet("crd-apiserver", pflag.ExitOnError)
	allowAll := fs.Bool("allow-all", false, "no authentication and AlwaysAllow authorization (local trials only)")
	o.AddFlags(fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		fail(err)
	}

	ro.CoreAPI = nil
	ro.Admission = nil
	ro.Features.EnablePriorityAndFairness = false
	if *allowAll {
		ro.Authentication = nil
		ro.Authorization = nil
	}
	if err := o.Complete(); err != nil {
		fail(err)
	}
	if err := o.Validate(); err != nil {
		fail(err)
	}

	server, err := newServer(o)
	if err != nil {
		fail(err)
	}
	registerCRDGroups(server)
	if err := server.GenericAPIServer.PrepareRun().RunWithContext(ctx); err != nil {
		fail(err)
	}
}

// newServer is options.Config() followed by New(), minus the shared informer factory that
// Config() expects from the core API, plus discovery and openAPI (see the file comment).
func newServer(o *options.CustomResourceDefinitionsServerOptions) (*apiserver.CustomResourceDefinitions, error) {
	ro := o.RecommendedOptions
	loopback := []net.IP{netutils.ParseIPSloppy("127.0.0.1")}
	if err := ro.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, loopback); err != nil {
		return nil, err
	}
	generic := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	if err := o.ServerRunOptions.ApplyTo(&generic.Config); err != nil {
		return nil, err
	}
	if err := ro.ApplyTo(generic); err != nil {
		return nil, err
	}
	if err := o.APIEnablement.ApplyTo(&generic.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return nil, err
	}
	definitions := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme)
	generic.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(definitions, namer)
	generic.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(definitions, namer)

	config := &apiserver.Config{
		GenericConfig: generic,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*ro.Etcd, generic.ResourceTransformers, generic.StorageObjectCountTracker),
			ServiceResolver:      webhook.NewDefaultServiceResolver(),
			AuthResolverWrapper: webhook.NewDefaultAuthenticationInfoResolverWrapper(
				nil, nil, generic.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	completed := config.Complete()
	completed.GenericConfig.EnableDiscovery = true
	return completed.New(genericapiserver.NewEmptyDelegate())
}

// registerCRDGroups keeps the legacy /apis group list equal to the groups of established CRDs,
// as the aggregator's APIService autoregistration does in kube-apiserver.
func registerCRDGroups(server *apiserver.CustomResourceDefinitions) {
	informer := server.Informers.Apiextensions().V1().CustomResourceDefinitions()
	groups := server.GenericAPIServer.DiscoveryGroupManager
	listed := sets.New[string]()
	resync := func() {
		crds, err := informer.Lister().List(labels.Everything())
		if err != nil {
			return
		}
		served := map[string]sets.Set[string]{}
		for _, crd := range crds {
			if !established(crd) {
				continue
			}
			for _, v := range crd.Spec.Versions {
				if v.Served {
					if served[crd.Spec.Group] == nil {
						served[crd.Spec.Group] = sets.New[string]()
					}
					served[crd.Spec.Group].Insert(v.Name)
				}
			}
		}
		for group, versions := range served {
			names := versions.UnsortedList()
			sort.Slice(names, func(i, j int) bool {
				return version.CompareKubeAwareVersionStrings(names[i], names[j]) > 0
			})
			entry := metav1.APIGroup{Name: group}
			for _, v := range names {
				entry.Versions = append(entry.Versions, metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v, Version: v})
			}
			entry.PreferredVersion = entry.Versions[0]
			groups.AddGroup(entry)
			listed.Insert(group)
		}
		for _, group := range listed.UnsortedList() {
			if _, ok := served[group]; !ok {
				groups.RemoveGroup(group)
				listed.Delete(group)
			}
		}
	}
	informer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { resync() },
		UpdateFunc: func(interface{}, interface{}) { resync() },
		DeleteFunc: func(interface{}) { resync() },
	})
}

func established(crd *apiextensionsv1.CustomResourceDefinition) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
			return true
		}
	}
	return false
}
